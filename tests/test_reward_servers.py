"""Reward servers over real HTTP: uvicorn server processes started with ``python -m diffrl.reward_servers
serve`` on free 127.0.0.1 ports. The contract in both encodings, every kind of bad input (and the
server keeps serving), concurrency, metrics, the client's failover with a replica killed mid-way,
group failure instead of a 0, the sync client, and (slow) the same app under Ray Serve."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from diffrl.models.shapes_world import all_prompts, render_prompt
from diffrl.proto import reward_pb2
from diffrl.reward_servers.client import (
    Group,
    RewardClient,
    RewardClientConfig,
    RewardEndpointConfig,
    RewardError,
    SyncRewardClient,
)
from diffrl.reward_servers.images import encode_png
from diffrl.reward_servers.process import LocalRewardServer
from diffrl.reward_servers.scorers import get_scorer
from diffrl.utils import free_port

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TOKEN = "s3cret-test-token"
HAS_TESSERACT = shutil.which("tesseract") is not None
PROTO = {"content-type": "application/x-protobuf", "authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}


# ----------------------------------------------------------------------------- server processes
class ServerProc(LocalRewardServer):
    """A reward server process for tests: started at once, without this process's
    DIFFRL_REWARD_TOKEN unless ``env`` gives one, its log removed by ``stop``."""

    def __init__(self, name: str, *args: str, port: int | None = None, env: dict | None = None):
        fd, log = tempfile.mkstemp(prefix=f"reward-{name}-", suffix=".log")
        os.close(fd)
        super().__init__(name, args, port=port, log_path=log, env={"DIFFRL_REWARD_TOKEN": None, **(env or {})})
        self.start()

    def kill(self, sig=signal.SIGKILL) -> None:
        super().stop(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        super().stop(sig, timeout)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from test_reward_scorers import build_onnx_model

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    build_onnx_model(path)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory, onnx_model):
    """All servers this module needs, started at once (they load in parallel) and always stopped."""
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    limits = ["limits.max_request_bytes=262144", "limits.max_items=16", "limits.max_image_pixels=16384",
              "limits.max_request_pixels=65536"]
    procs = {
        "shapes": ServerProc("shapes", "--token-file", str(token_file), *limits),
        "onnx": ServerProc("onnx", f"scorer.path={onnx_model}", "scorer.input_size=[8,8]", "scorer.output=margin",
                           "scorer.mean=[0.5,0,0]", "scorer.name=margin", "execution.microbatch=always", "execution.max_wait_ms=20"),
        "a": ServerProc("shapes"),
        "b": ServerProc("shapes"),
    }
    if HAS_TESSERACT:
        procs["ocr"] = ServerProc("ocr", "scorer.metric=normalized")
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def shapes_batch(n: int, start: int = 0, wrong_every: int = 3):
    prompts = all_prompts()[start * 7:][::7][:n]
    images = [render_prompt(p, 1000 + i) for i, p in enumerate(prompts)]
    # every third image is scored against another prompt, so scores are not all 1
    asked = [prompts[(i + 1) % n] if i % wrong_every == 0 else p for i, p in enumerate(prompts)]
    return images, asked


def score_request(images, prompts, metadata=None) -> reward_pb2.ScoreRequest:
    metadata = metadata or [{}] * len(images)
    return reward_pb2.ScoreRequest(items=[
        reward_pb2.Item(png=encode_png(im), prompt=p, metadata=m) for im, p, m in zip(images, prompts, metadata)])


def post_proto(url, req, headers=PROTO, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", content=req.SerializeToString(), headers=headers, timeout=30, **kw)


# ----------------------------------------------------------------------------- contract
def test_contract_protobuf_and_json_agree_with_in_process(servers):
    url = servers["shapes"].url
    images, prompts = shapes_batch(8)
    want, want_details = get_scorer("shapes").score_batch(images, prompts, [{}] * 8)
    assert 0 < np.mean(want) < 1
    r = post_proto(url, score_request(images, prompts))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    resp = reward_pb2.ScoreResponse.FromString(r.content)
    assert list(resp.scores) == pytest.approx(want) and list(resp.errors) == [""] * 8
    assert list(resp.details["partial"].values) == pytest.approx(want_details["partial"])
    # JSON: what curl sends (base64 PNG in the protobuf JSON mapping)
    body = {"items": [{"png": base64.b64encode(encode_png(im)).decode(), "prompt": p}
                      for im, p in zip(images, prompts)]}
    r = httpx.post(f"{url}/v1/score", json=body, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    js = r.json()
    assert js["scores"] == pytest.approx(want) and js["errors"] == [""] * 8
    assert js["details"]["count"]["values"] == pytest.approx(want_details["count"])
    # Accept picks the response encoding
    r = post_proto(url, score_request(images[:1], prompts[:1]), headers={**PROTO, "accept": "application/json"})
    assert r.json()["scores"] == pytest.approx(want[:1])


def test_info_health_and_token(servers):
    url = servers["shapes"].url
    info = httpx.get(f"{url}/v1/info", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert info["name"] == "shapes" and info["higherIsBetter"] is True
    assert (info["minScore"], info["maxScore"]) == (0.0, 1.0) and info["maxItemsPerRequest"] == 16
    r = httpx.get(f"{url}/v1/info", headers={"authorization": f"Bearer {TOKEN}", "accept": "application/x-protobuf"})
    assert reward_pb2.RewardInfo.FromString(r.content).max_image_pixels == 16384
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"  # health and metrics need no token
    images, prompts = shapes_batch(2)
    for headers in ({"content-type": "application/x-protobuf"},
                    {"content-type": "application/x-protobuf", "authorization": "Bearer wrong"},
                    {"content-type": "application/x-protobuf", "authorization": TOKEN}):
        r = post_proto(url, score_request(images, prompts), headers=headers)
        assert r.status_code == 401 and r.json()["kind"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/info").status_code == 401


def _png_header_bomb(width: int, height: int) -> bytes:
    from test_reward_scorers import _png_with_header

    return _png_with_header(width, height)


def test_bad_inputs_get_clear_4xx_and_server_keeps_serving(servers):
    url = servers["shapes"].url
    images, prompts = shapes_batch(2)
    good = score_request(images, prompts)
    png = encode_png(images[0])

    def item(png_bytes=png, prompt=prompts[0], **meta):
        return reward_pb2.Item(png=png_bytes, prompt=prompt, metadata=meta)

    cases = {
        "truncated png": (post_proto(url, reward_pb2.ScoreRequest(items=[item(png[: len(png) // 2])])), 400, "bad_image"),
        "not an image": (post_proto(url, reward_pb2.ScoreRequest(items=[item(b"hello, I am text")])), 400, "bad_image"),
        "bomb header": (post_proto(url, reward_pb2.ScoreRequest(items=[item(_png_header_bomb(60000, 60000))])),
                        413, "image_too_large"),
        "too many pixels": (post_proto(url, reward_pb2.ScoreRequest(
            items=[item(encode_png(np.zeros((130, 130, 3), np.uint8)))])), 413, "image_too_large"),
        "request pixels": (post_proto(url, reward_pb2.ScoreRequest(
            items=[item(encode_png(np.zeros((120, 120, 3), np.uint8)))] * 5)), 413, "image_too_large"),
        "empty batch": (post_proto(url, reward_pb2.ScoreRequest()), 400, "empty_batch"),
        "too many images": (post_proto(url, reward_pb2.ScoreRequest(items=[item()] * 17)), 413, "too_many_items"),
        "missing prompt": (post_proto(url, reward_pb2.ScoreRequest(items=[item(), item(prompt="")])), 422,
                           "missing_prompt"),
        "prompt outside grammar": (post_proto(url, reward_pb2.ScoreRequest(items=[item(prompt="a purple dog")])),
                                   422, "invalid_item"),
        "wrong content type": (httpx.post(f"{url}/v1/score", content=good.SerializeToString(),
                                          headers={**PROTO, "content-type": "image/png"}), 415, "unsupported_media_type"),
        "no content type": (httpx.post(f"{url}/v1/score", content=b"{}",
                                       headers={"authorization": f"Bearer {TOKEN}"}), 415, "unsupported_media_type"),
        "garbage protobuf": (httpx.post(f"{url}/v1/score", content=b"\xff\xff\xff\x0f", headers=PROTO), 400,
                             "bad_request"),
        "garbage json": (httpx.post(f"{url}/v1/score", content=b'{"items": [{"png": 12}]', headers=JSON), 400,
                         "bad_request"),
        "unknown json field": (httpx.post(f"{url}/v1/score", content=b'{"images": []}', headers=JSON), 400,
                               "bad_request"),
        "oversized (content-length)": (httpx.post(f"{url}/v1/score", content=b"\0" * 300_000, headers=PROTO), 413,
                                       "request_too_large"),
        "oversized (streamed)": (httpx.post(f"{url}/v1/score", content=iter([b"\0" * 65536] * 5), headers=PROTO),
                                 413, "request_too_large"),
    }
    for what, (r, status, kind) in cases.items():
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        assert body["kind"] == kind and body["error"], (what, body)
    assert "items[1]" in cases["missing prompt"][0].json()["error"]
    assert "60000x60000" in cases["bomb header"][0].json()["error"]
    assert httpx.get(f"{url}/v1/score").status_code == 405
    # still serving, same answers
    r = post_proto(url, good)
    assert r.status_code == 200 and len(reward_pb2.ScoreResponse.FromString(r.content).scores) == 2
    metrics = httpx.get(f"{url}/metrics").text
    assert 'diffrl_reward_errors_total{kind="image_too_large",reward="shapes"}' in metrics


def test_concurrent_requests_get_their_own_answers(servers):
    url = servers["shapes"].url
    batches = [shapes_batch(4, start=k, wrong_every=2 + k % 3) for k in range(24)]
    scorer = get_scorer("shapes")
    want = [scorer.score_batch(ims, ps, [{}] * 4)[0] for ims, ps in batches]
    assert len({tuple(w) for w in want}) > 1

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post(f"{url}/v1/score", content=score_request(*b).SerializeToString(),
                                               headers=PROTO) for b in batches))
        return [list(reward_pb2.ScoreResponse.FromString(r.content).scores) for r in rs]

    got = asyncio.run(run())
    assert got == [pytest.approx(w) for w in want]


def test_metrics_after_use(servers):
    images, prompts = shapes_batch(3)
    assert post_proto(servers["shapes"].url, score_request(images, prompts)).status_code == 200
    text = httpx.get(f"{servers['shapes'].url}/metrics").text
    for name in ("diffrl_reward_request_duration_seconds_bucket", "diffrl_reward_images_scored_total",
                 "diffrl_reward_batch_size_images_bucket", "diffrl_reward_errors_total",
                 "diffrl_reward_scorer_duration_seconds_count", "diffrl_reward_requests_total"):
        assert name in text, name
    scored = [line for line in text.splitlines() if line.startswith("diffrl_reward_images_scored_total{")]
    assert float(scored[0].split()[-1]) >= 3
    assert "three" not in text and "circle" not in text  # no prompt text in labels


def test_onnx_server_microbatches_and_reports_item_errors(servers):
    url = servers["onnx"].url
    red, blue = np.full((8, 8, 3), (255, 20, 20), np.uint8), np.full((8, 8, 3), (20, 20, 230), np.uint8)
    info = httpx.get(f"{url}/v1/info").json()
    assert info["name"] == "margin" and info["version"].startswith("sha256:")

    def scorer_calls() -> float:
        text = httpx.get(f"{url}/metrics").text
        prefix = 'diffrl_reward_batch_size_images_count{reward="margin",stage="scorer"}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    calls0 = scorer_calls()

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            reqs = [score_request([blue, blue], ["", ""]) for _ in range(12)]
            return await asyncio.gather(*(c.post(f"{url}/v1/score", content=r.SerializeToString(),
                                                 headers={"content-type": "application/x-protobuf"}) for r in reqs))

    rs = asyncio.run(run())
    want = float(np.log(1 - np.float32(20 / 255)))  # log(0.5 - (red - mean)) with mean 0.5
    for r in rs:
        resp = reward_pb2.ScoreResponse.FromString(r.content)
        assert list(resp.scores) == pytest.approx([want, want], rel=1e-5) and list(resp.errors) == ["", ""]
    assert 0 < scorer_calls() - calls0 < 12  # 12 concurrent requests, fewer scorer calls
    # a pure red image makes the model output log(0) = -inf: that item gets errors[i], the other keeps its score
    r = post_proto(url, score_request([blue, red], ["", ""]), headers={"content-type": "application/x-protobuf"})
    resp = reward_pb2.ScoreResponse.FromString(r.content)
    assert r.status_code == 200 and resp.errors[0] == "" and "non-finite" in resp.errors[1]


@pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract is not installed (apt-get install tesseract-ocr)")
def test_ocr_server_reads_rendered_words(servers):
    from diffrl.reward_servers.bench import render_word

    words = ["hello", "zebra", "river", "policy"]
    images = [render_word(w, 128 if len(w) <= 5 else 256) for w in words]
    prompts = ['a sign that says "hello"', 'a poster with "zebra" on it', 'a sign that says "rover"', "no quote"]
    url = servers["ocr"].url
    r = post_proto(url, score_request(images, prompts), headers={"content-type": "application/x-protobuf"})
    assert r.status_code == 422 and "items[3]" in r.json()["error"]  # no quoted text: refused
    r = post_proto(url, score_request(images, prompts[:3] + ["x"], [{}, {}, {}, {"text": "policy"}]),
                   headers={"content-type": "application/x-protobuf"})
    resp = reward_pb2.ScoreResponse.FromString(r.content)
    assert list(resp.scores) == pytest.approx([1.0, 1.0, 1 - 1 / 5, 1.0])  # river vs rover: distance 1
    assert list(resp.details["distance"].values) == [0.0, 0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------- client
def _client_cfg(**rewards) -> RewardClientConfig:
    return RewardClientConfig(rewards=[
        RewardEndpointConfig(name=name, **({"health_check_interval_s": 0.2, "backoff_initial_s": 0.01,
                                           "timeout_s": 20.0} | kw)) for name, kw in rewards.items()])


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_client_failover_with_a_replica_killed(servers):
    a, b = servers["a"], servers["b"]
    cfg = _client_cfg(shapes={"urls": [a.url, b.url], "retries": 3})
    groups = [shapes_batch(4, start=k) for k in range(30)]
    scorer = get_scorer("shapes")
    want = [scorer.score_batch(ims, ps, [{}] * 4)[0] for ims, ps in groups]
    ejected0 = _metric("diffrl_reward_client_ejections_total", reward="shapes")
    retries0 = _metric("diffrl_reward_client_retries_total", reward="shapes")

    async def run():
        async with RewardClient(cfg) as client:
            sem = asyncio.Semaphore(4)
            done = 0

            async def one(k):
                nonlocal done
                async with sem:
                    ims, ps = groups[k]
                    res = await client.score_group(ims, ps)
                    done += 1
                    if done == 8:
                        a.kill()  # mid-way: requests in flight or queued for it must fail over
                    return res

            results = await asyncio.gather(*(one(k) for k in range(len(groups))))
            return results, client.replica_health()

    results, health = asyncio.run(run())
    assert a.proc.poll() is not None
    for res, w in zip(results, want):
        assert res.ok and res.scores["shapes"] == pytest.approx(w) and res.combined == pytest.approx(w)
    assert health["shapes"] == {a.url: False, b.url: True}
    assert _metric("diffrl_reward_client_ejections_total", reward="shapes") == ejected0 + 1
    assert _metric("diffrl_reward_client_retries_total", reward="shapes") >= retries0 + 1


def test_client_readmits_a_replica_after_health_checks(servers):
    b = servers["b"]
    port = free_port()
    cfg = _client_cfg(shapes={"urls": [f"http://127.0.0.1:{port}", b.url], "retries": 2})
    ims, ps = shapes_batch(2)
    readmit0 = _metric("diffrl_reward_client_readmissions_total", reward="shapes")
    with SyncRewardClient(cfg) as client:
        for _ in range(3):
            assert client.score_group(ims, ps).ok
        assert client.replica_health()["shapes"][f"http://127.0.0.1:{port}"] is False
        late = ServerProc("shapes", port=port)
        try:
            late.wait_ready()
            deadline = time.monotonic() + 10
            while not client.replica_health()["shapes"][late.url] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.replica_health()["shapes"][late.url] is True
            assert _metric("diffrl_reward_client_readmissions_total", reward="shapes") == readmit0 + 1
            assert client.score_group(ims, ps).ok
        finally:
            late.stop()


def test_failed_reward_fails_the_group_never_zero(servers):
    dead = f"http://127.0.0.1:{free_port()}"
    red, blue = np.full((8, 8, 3), (255, 20, 20), np.uint8), np.full((8, 8, 3), (20, 20, 230), np.uint8)
    cfg = _client_cfg(
        shapes={"urls": [servers["b"].url], "weight": 2.0},
        margin={"urls": [servers["onnx"].url], "weight": -1.0},
        down={"urls": [dead], "retries": 2},
    )
    fails0 = _metric("diffrl_reward_client_group_failures_total", reward="down", kind="connection")
    with SyncRewardClient(cfg) as client:
        res = client.score_groups([Group([blue, blue], ["a blue square", "a red circle"])])
        assert not res[0].ok and res[0].failure.reward == "down" and res[0].failure.kind == "connection"
        assert res[0].scores == {} and res[0].combined == []
        with pytest.raises(RewardError, match="'down'.*gave up after 3 attempts"):
            client.score_group([blue], "a blue square")
    assert _metric("diffrl_reward_client_group_failures_total", reward="down", kind="connection") == fails0 + 2

    # without the dead reward: weighted combination with each reward kept; a NaN item fails its group
    cfg = _client_cfg(shapes={"urls": [servers["b"].url], "weight": 2.0},
                      margin={"urls": [servers["onnx"].url], "weight": -1.0})
    ims, ps = shapes_batch(3)
    with SyncRewardClient(cfg) as client:
        ok = client.score_group(ims, ps)
        assert set(ok.scores) == {"shapes", "margin"} and "partial" in ok.details["shapes"]
        assert ok.combined == pytest.approx([2 * s - m for s, m in zip(ok.scores["shapes"], ok.scores["margin"])])
        groups = [Group(ims, ps), Group([red, blue], "a red circle"), Group([blue], "a purple dog")]
        out = client.score_groups(groups)
        assert out[0].ok and out[0].combined == pytest.approx(ok.combined)
        assert out[1].failure.kind == "item_error" and out[1].failure.reward == "margin"
        assert "image 0" in out[1].failure.message and out[1].combined == []
        assert out[2].failure.kind == "rejected" and out[2].failure.status == 422 and out[2].failure.reward == "shapes"
        assert client.info("margin")["name"] == "margin"


def test_ray_serve_config_file_is_valid_and_builds():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from diffrl.reward_servers.serve import build_app, dict_to_overrides

    spec = yaml.safe_load((REPO / "deploy/serve/rewards.yaml").read_text())
    apps = ServeDeploySchema.model_validate(spec).applications
    assert {a.name for a in apps} >= {"shapes", "ocr", "compressibility", "detector"}
    for app in spec["applications"]:
        assert app["import_path"] == "diffrl.reward_servers.serve:build_app"
        assert app["deployments"][0]["autoscaling_config"]["max_replicas"] > 1
        build_app(app["args"])  # builds the bound application (no Ray needed)
    with pytest.raises(ValueError, match="unknown build_app args"):
        build_app({"name": "shapes", "bogus": 1})
    assert dict_to_overrides({"scorer": {"mean": [0.5, 0, 0], "min_score": float("-inf")}, "limits": {"max_items": 8}}) \
        == ["scorer.mean=[0.5, 0, 0]", "scorer.min_score=-.inf", "limits.max_items=8"]


def test_cli_refuses_bad_config_with_the_field_name():
    r = subprocess.run([PY, "-m", "diffrl.reward_servers", "serve", "compressibility", "--port", "0", "scorer.direction=up"],
                       cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "scorer.direction" in r.stderr and "compress or incompress" in r.stderr
    r = subprocess.run([PY, "-m", "diffrl.reward_servers", "serve", "shapes", "limits.max_items=0"],
                       cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "limits.max_items" in r.stderr


def test_reward_bench_runs_in_process_and_over_http_through_the_shared_launcher(tmp_path):
    """`diffrl bench reward` (its server comes from reward_servers.process, like the job's) on a tiny load."""
    from diffrl.reward_servers.bench import RewardBenchConfig, bench_reward, format_report

    out = tmp_path / "bench.json"
    r = bench_reward(RewardBenchConfig(name="compressibility", batch_size=4, batches=2, min_seconds=0.2, warmup=1,
                                       repeats=1, concurrency=1, output=str(out)))
    assert set(r["images_per_s"]) == {"in_process", "in_process_with_decode", "http_protobuf", "http_json"}
    assert all(v > 0 for v in r["images_per_s"].values()) and r["request_bytes"]["protobuf"] > 0
    assert json.loads(out.read_text())["reward"] == "compressibility" and format_report(r).startswith("| compressibility")
