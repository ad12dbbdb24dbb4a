"""Reward servers as Ray Serve deployments: the same FastAPI app (``create_app``), the same
protocol, replicas autoscaled by Ray Serve.

Each replica builds its scorer and app at start-up (``__serve_build_asgi_app__``, wrapped by
``@serve.ingress``), so nothing but plain config dicts travels to the replicas. Clients use the
application's route prefix as the base URL (``http://HOST:8000/shapes``), exactly like a plain
server's ``http://HOST:PORT``.

Run one reward::

    serve run diffrl.reward_servers.serve:build_app name=shapes                      # dev, CLI args
    serve deploy deploy/serve/rewards.yaml                                     # all rewards, autoscaled

or from Python: ``serve.run(build_app({"name": "shapes"}), name="shapes", route_prefix="/shapes")``.
The bearer token, if any, is read by each replica from ``$DIFFRL_REWARD_TOKEN`` (set it with
``runtime_env: {env_vars: ...}`` from a secret, not in the YAML checked into git).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ray import serve

from diffrl.reward_servers.config import TOKEN_ENV

DEFAULT_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 4,
    "upscale_delay_s": 10.0,
    "downscale_delay_s": 60.0,
}
"""Autoscaling used when the application args give none (scale on requests in flight per replica)."""


def dict_to_overrides(d: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """{"limits": {"max_items": 64}} -> ["limits.max_items=64"] (values as YAML flow scalars)."""
    out: list[str] = []
    for key, value in (d or {}).items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(dict_to_overrides(value, dotted + "."))
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{dotted}={'.nan' if math.isnan(value) else ('.inf' if value > 0 else '-.inf')}")
        else:
            out.append(f"{dotted}={json.dumps(value)}")
    return out


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16, health_check_period_s=10)
@serve.ingress()
class RewardDeployment:
    """One replica of reward ``name``; ``config`` holds the serve keys (limits, execution, scorer)."""

    def __init__(self, name: str, config: dict[str, Any] | None = None):
        self.name = name
        self.config = dict(config or {})

    def __serve_build_asgi_app__(self):
        from diffrl.config import load_config
        from diffrl.reward_servers.app import create_app
        from diffrl.reward_servers.cli import serve_schema
        from diffrl.reward_servers.scorers import get_scorer

        cfg = load_config(serve_schema(self.name), None, dict_to_overrides(self.config))
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        scorer = get_scorer(self.name, cfg.scorer)
        return create_app(scorer, cfg.limits, token=token, execution=cfg.execution)


def build_app(args: dict[str, Any]):
    """Application builder: ``args = {"name": REWARD, "scorer": {...}, "limits": {...},
    "execution": {...}, "autoscaling_config": {...}, "num_cpus": 1}``."""
    args = dict(args)
    name = args.pop("name", None)
    if not name:
        raise ValueError("build_app needs args['name'] (a reward: shapes, ocr, compressibility, detector, onnx)")
    autoscaling = args.pop("autoscaling_config", None) or DEFAULT_AUTOSCALING
    num_cpus = float(args.pop("num_cpus", 1))
    config = {k: args.pop(k) for k in ("scorer", "limits", "execution") if k in args}
    if args:
        raise ValueError(f"unknown build_app args: {sorted(args)} (expected name, scorer, limits, execution, "
                         "autoscaling_config, num_cpus)")
    return RewardDeployment.options(
        name=f"reward-{name}",
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": num_cpus},
    ).bind(name, config)
