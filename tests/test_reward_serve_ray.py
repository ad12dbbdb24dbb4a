"""The same reward app as a Ray Serve deployment (autoscaling config, route prefix), scored through
the same client; Serve and Ray are shut down afterwards."""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest

from diffrl.models.shapes_world import all_prompts, render_prompt
from diffrl.reward_servers.client import RewardClientConfig, RewardEndpointConfig, SyncRewardClient
from diffrl.reward_servers.scorers import get_scorer
from diffrl.utils import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve_url():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from diffrl.reward_servers.serve import build_app

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    port = free_port()
    own_ray = not ray.is_initialized()  # another test module may have started Ray in this session
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "name": "shapes",
            "scorer": {"score": "partial"},
            "limits": {"max_items": 32},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
            "num_cpus": 0.5,
        })
        serve.run(app, name="shapes", route_prefix="/shapes")
        yield f"http://127.0.0.1:{port}/shapes"
    finally:
        try:
            serve.shutdown()
        finally:
            if own_ray:
                ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def test_ray_serve_deployment_scores_through_the_same_client(serve_url):
    info = httpx.get(f"{serve_url}/v1/info", timeout=30).json()
    assert info["name"] == "shapes" and info["maxItemsPerRequest"] == 32
    assert httpx.get(f"{serve_url}/healthz", timeout=30).json()["status"] == "ok"
    prompts = all_prompts()[::23][:8]
    groups = [([render_prompt(p, s) for s in range(4)], [prompts[(i + s) % 8] for s in range(4)])
              for i, p in enumerate(prompts)]
    scorer = get_scorer("shapes", score="partial")
    cfg = RewardClientConfig(rewards=[RewardEndpointConfig(name="shapes", urls=[serve_url], timeout_s=60)])
    with SyncRewardClient(cfg) as client:
        for images, asked in groups:
            res = client.score_group(images, asked)
            assert res.ok and res.scores["shapes"] == pytest.approx(scorer.score_batch(images, asked, [{}] * 4)[0])
    r = httpx.post(f"{serve_url}/v1/score", content=b"x", headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 415  # same protocol, same refusals
    assert "diffrl_reward_images_scored_total" in httpx.get(f"{serve_url}/metrics", timeout=30).text
