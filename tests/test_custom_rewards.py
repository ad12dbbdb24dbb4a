"""Custom rewards without forking (docs/custom_rewards.md): a Scorer subclass named by its import path
(``diffrl reward serve --scorer pkg.module:Class``, ``RewardSpec.scorer``) served over real HTTP with
the built-in servers' limits, token and metrics; clear one-line errors for bad import paths; the
example recipe; pass thresholds in /v1/info and the client."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffrl.config import ConfigError, load_config
from diffrl.models.shapes_world import eval_prompts, render_batch
from diffrl.proto import reward_pb2
from diffrl.reward_servers.client import RewardClientConfig, RewardEndpointConfig, SyncRewardClient
from diffrl.reward_servers.images import encode_png
from diffrl.reward_servers.process import LocalRewardServer
from diffrl.reward_servers.scorers import ScorerImportError, get_scorer, scorer_class
from diffrl.schema import TrainConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_reward"
TARGET = "brightness:BrightnessScorer"
TOKEN = "custom-reward-token"
PROTO = {"content-type": "application/x-protobuf"}

# A scorer without a name of its own that fails on pure-black images (per-item errors) and refuses
# items without metadata "ok" (422): served under --name with 2 worker processes.
FLAKY = '''
import numpy as np
from diffrl.reward_servers.scorers.base import Scorer

class Flaky(Scorer):
    description = "1 - mean / 255; raises on black images"
    def check_item(self, prompt, metadata):
        return None if "ok" in metadata else "needs metadata ok"
    def score_batch(self, images, prompts, metadata):
        if any(not np.asarray(im).any() for im in images):
            raise ValueError("a black image")
        return [1.0 - float(np.asarray(im).mean()) / 255.0 for im in images], {}
'''


def server(name: str, scorer: str, *args: str, pythonpath: Path, tmp_path: Path, token: str | None = None):
    return LocalRewardServer(name, args, scorer=scorer, log_path=tmp_path / f"reward-{name}.log",
                             env={"PYTHONPATH": str(pythonpath), "DIFFRL_REWARD_TOKEN": token})


def request(images, prompts, metadata=None) -> bytes:
    metadata = metadata or [{}] * len(images)
    return reward_pb2.ScoreRequest(items=[
        reward_pb2.Item(png=encode_png(im), prompt=p, metadata=m) for im, p, m in zip(images, prompts, metadata)
    ]).SerializeToString()


def sample(scrape: str, metric: str, **labels: str) -> float:
    """The value of the first sample of ``metric`` with these labels in a Prometheus text scrape (0: none)."""
    for line in scrape.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return scorer_class(TARGET)


# ----------------------------------------------------------------------------- served over HTTP
def test_example_scorer_served_by_import_path_matches_the_class(tmp_path, example_on_path):
    prompts = eval_prompts()[:6]
    images = [*render_batch(prompts, list(range(6))), np.zeros((32, 32, 3), np.uint8),
              np.full((20, 24, 3), 255, np.uint8)]
    prompts = [*prompts, "black", "white"]
    direct = example_on_path(example_on_path.Options(target=0.4))
    want, want_details = direct.score_batch(images, prompts, [{}] * len(images))
    auth = {"authorization": f"Bearer {TOKEN}"}

    with server("brightness", TARGET, "scorer.target=0.4", pythonpath=EXAMPLE, tmp_path=tmp_path, token=TOKEN) as srv:
        url = srv.url
        r = httpx.post(f"{url}/v1/score", content=request(images, prompts), headers=PROTO)
        assert r.status_code == 401  # the token is honoured
        r = httpx.post(f"{url}/v1/score", content=request(images, prompts), headers={**PROTO, **auth})
        assert r.status_code == 200, r.text
        resp = reward_pb2.ScoreResponse.FromString(r.content)
        assert list(resp.errors) == [""] * len(images)
        np.testing.assert_allclose(resp.scores, want, rtol=0, atol=1e-6)  # float32 on the wire
        np.testing.assert_allclose(resp.details["brightness"].values, want_details["brightness"], atol=1e-6)
        assert want[-2] == pytest.approx(0.6) and want[-1] == pytest.approx(0.4)

        # malformed requests are refused with 4xx and the server keeps serving
        r = httpx.post(f"{url}/v1/score", content=request(images[:2], prompts[:2], [{}, {"brightness": "dim"}]),
                       headers={**PROTO, **auth})
        assert r.status_code == 422 and "items[1]" in r.json()["error"] and "brightness" in r.json()["error"]
        bad = reward_pb2.ScoreRequest(items=[reward_pb2.Item(png=b"\x89PNG\r\n\x1a\nnot really")])
        r = httpx.post(f"{url}/v1/score", content=bad.SerializeToString(), headers={**PROTO, **auth})
        assert r.status_code == 400
        r = httpx.post(f"{url}/v1/score", content=b"{not json", headers={"content-type": "application/json", **auth})
        assert r.status_code == 400
        # a per-item metadata target, through the client (JSON info, protobuf scoring)
        cfg = RewardClientConfig(rewards=[RewardEndpointConfig(name="brightness", urls=[url])])
        with SyncRewardClient(cfg, token=TOKEN) as client:
            res = client.score_group(images[-2:], "", [{"brightness": "0"}, {}])
            assert res.scores["brightness"] == pytest.approx([1.0, 0.4], abs=1e-6)
            info = client.info("brightness")
        assert info["name"] == "brightness" and info["version"] == "1" and info["higher_is_better"]
        # the float32 the scores travel in: a score equal to the threshold passes
        assert info["pass_threshold"] == float(np.float32(0.9))

        scrape = httpx.get(f"{url}/metrics").text  # open without the token
        assert sample(scrape, "diffrl_reward_images_scored_total", reward="brightness") == 10
        for kind, n in (("unauthorized", 1), ("invalid_item", 1), ("bad_request", 1)):
            assert sample(scrape, "diffrl_reward_errors_total", reward="brightness", kind=kind) == n, kind
    assert "diffrl reward server 'brightness'" in srv.output()


def test_nameless_scorer_under_name_with_workers_and_per_item_errors(tmp_path):
    (tmp_path / "flaky_reward_mod.py").write_text(textwrap.dedent(FLAKY))
    grey = np.full((16, 16, 3), 51, np.uint8)
    black = np.zeros((16, 16, 3), np.uint8)
    with server("flaky", "flaky_reward_mod:Flaky", "--workers", "2", pythonpath=tmp_path, tmp_path=tmp_path) as srv:
        r = httpx.post(f"{srv.url}/v1/score", content=request([grey, black, grey], ["", "", ""], [{"ok": "1"}] * 3),
                       headers=PROTO)
        assert r.status_code == 200, r.text
        resp = reward_pb2.ScoreResponse.FromString(r.content)
        # the batch raised: re-scored item by item, only the black image fails, never a 0 in its place
        assert resp.errors[0] == resp.errors[2] == "" and "a black image" in resp.errors[1]
        assert resp.scores[0] == pytest.approx(0.8) and resp.scores[2] == pytest.approx(0.8)
        r = httpx.post(f"{srv.url}/v1/score", content=request([grey], [""]), headers=PROTO)
        assert r.status_code == 422 and "needs metadata ok" in r.json()["error"]
        health = httpx.get(f"{srv.url}/healthz").json()
        assert health["reward"] == "flaky"
        cfg = RewardClientConfig(rewards=[RewardEndpointConfig(name="flaky", urls=[srv.url])])
        with SyncRewardClient(cfg) as client:
            info = client.info("flaky")
        assert info["name"] == "flaky" and info["pass_threshold"] is None
        assert 'reward="flaky"' in httpx.get(f"{srv.url}/metrics").text  # aggregated over the workers
    assert "with 2 workers" in srv.output()


# ----------------------------------------------------------------------------- bad --scorer values
def test_bad_scorer_paths_fail_with_one_clear_line(tmp_path, monkeypatch, capsys):
    from diffrl.reward_servers.cli import main

    (tmp_path / "crx_broken.py").write_text("def oops(:\n")
    (tmp_path / "crx_raises.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "crx_half.py").write_text(textwrap.dedent('''
        from diffrl.reward_servers.scorers.base import Scorer
        class Half(Scorer):
            name = "half"
        class Duck:
            name = "duck"
            def score_batch(self, images, prompts, metadata):
                return [0.0] * len(images), {}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    cases = {
        "crx_missing_mod:X": "cannot import module 'crx_missing_mod' (ModuleNotFoundError",
        "crx_broken:X": "importing module 'crx_broken' failed: SyntaxError",
        "crx_raises:X": "importing module 'crx_raises' failed: RuntimeError: no GPU here",
        "brightness:Nope": "module 'brightness' has no attribute 'Nope'",
        "brightness:BrightnessOptions": "BrightnessOptions is not a subclass of diffrl.reward_servers.scorers.base.Scorer",
        "crx_half:Duck": "Duck is not a subclass",
        "crx_half:Half": "Half does not implement score_batch",
        "brightness:": "expected an import path of the form pkg.module:Class",
    }
    for target, message in cases.items():
        with pytest.raises(ScorerImportError, match="^scorer: ") as err:
            scorer_class(target)
        assert message in str(err.value) and "\n" not in str(err.value), (target, str(err.value))
        assert main(["serve", "--scorer", target]) == 2
        line = capsys.readouterr().err
        assert line.startswith(f"diffrl: bad config: --scorer {target}: ") and message in line
        assert line.count("\n") == 1, line
    assert main(["serve", "--scorer", "brightnes"]) == 2
    assert "expected a built-in scorer name (" in capsys.readouterr().err

    # the real command line, as `diffrl train` starts it: exit status 2 with one line, raised by the
    # launcher as that line (a ConfigError: `diffrl train` exits 2 with it, no traceback)
    bad = LocalRewardServer("brightness", scorer="brightness:Nope", log_path=tmp_path / "bad.log",
                            env={"PYTHONPATH": str(EXAMPLE)})
    with pytest.raises(ConfigError, match="^reward server 'brightness': --scorer brightness:Nope: module "):
        bad.start().wait_ready()
    assert bad.proc.returncode == 2 and bad.output().splitlines() == [
        "diffrl: bad config: --scorer brightness:Nope: module 'brightness' has no attribute 'Nope'"]
    assert main(["serve", "--scorer", TARGET, "scorer.target=2"]) == 2  # its Options are validated
    assert "scorer.target: expected a float in [0, 1]" in capsys.readouterr().err
    # built-in NAME unchanged: argparse's own refusal of an unknown name
    for argv, message in ((["bogus"], "argument NAME: invalid choice: 'bogus' (choose from 'compressibility'"),
                          (["shapes", "--scorer", TARGET], "give NAME or --scorer, not both"),
                          ([], "the following arguments are required: NAME")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_the_custom_scorers_options(example_on_path, capsys):
    from diffrl.reward_servers.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--scorer", TARGET, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--scorer pkg.module:Class" in out
    assert f"[{TARGET}]" in out and "scorer.target (float, default 0.5)" in out
    assert "[shapes]" not in out  # only the chosen scorer's options


# ----------------------------------------------------------------------------- recipe
def test_recipe_with_a_custom_scorer_loads_and_validates():
    cfg = load_config(TrainConfig, EXAMPLE / "recipe.yaml")
    (spec,) = cfg.rewards
    assert (spec.name, spec.scorer, spec.urls) == ("brightness", TARGET, [])
    assert cfg.learner.algorithm == "crd"
    cfg = load_config(TrainConfig, None, ["rewards=[{name: strict, scorer: shapes}, {name: b, scorer: pkg.mod:Cls}]"])
    assert [r.scorer for r in cfg.rewards] == ["shapes", "pkg.mod:Cls"]
    from diffrl.reward_servers.cli import build_scorer  # what `serve --scorer shapes --name strict` builds

    assert build_scorer("shapes", None, "strict").name == "strict"
    for bad, expected in (("not-a-scorer", "a built-in scorer name"), ("pkg.mod:", "pkg.module:Class"),
                          ("pkg mod:X", "pkg.module:Class")):
        with pytest.raises(ConfigError, match=r"rewards\.0\.scorer: expected .*" + expected):
            load_config(TrainConfig, EXAMPLE / "recipe.yaml", [f"rewards=[{{name: b, scorer: '{bad}'}}]"])


# ----------------------------------------------------------------------------- pass thresholds
def test_pass_thresholds_of_the_built_ins_reach_v1_info():
    from fastapi.testclient import TestClient

    from diffrl.reward_servers.app import create_app
    from diffrl.reward_servers.config import ServerLimits

    assert scorer_class("ocr").pass_threshold == 1.0  # exact text (no tesseract needed to read it)
    assert get_scorer("detector").info()["pass_threshold"] == 1.0  # exact count
    for score in ("strict", "partial", "count", "color", "shape", "jaccard"):
        assert get_scorer("shapes", score=score).info()["pass_threshold"] == 1.0
    assert get_scorer("compressibility").info()["pass_threshold"] is None

    for name, want in (("shapes", 1.0), ("compressibility", None)):
        with TestClient(create_app(get_scorer(name), ServerLimits())) as http:
            msg = reward_pb2.RewardInfo.FromString(
                http.get("/v1/info", headers={"accept": "application/x-protobuf"}).content)
            as_json = http.get("/v1/info").json()
        assert msg.HasField("pass_threshold") == (want is not None)
        assert as_json.get("passThreshold") == want
        if want is not None:
            assert msg.pass_threshold == want


def test_shapes_pass_threshold_means_strict_for_partial():
    """partial = 1 exactly when strict = 1, so partial's pass rate is the strict accuracy."""
    prompts = eval_prompts()[:8]
    images = render_batch(prompts, list(range(8)))
    wrong = prompts[1:] + prompts[:1]
    sc = get_scorer("shapes", score="partial")
    scores, details = sc.score_batch(list(images) * 2, [*prompts, *wrong], [{}] * 16)
    passed = [s >= sc.pass_threshold for s in scores]
    assert passed == [bool(s) for s in details["strict"]] and any(passed) and not all(passed)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_diffrl_train_against_the_custom_reward(tmp_path):
    """`diffrl train examples/custom_reward/recipe.yaml` with the module on PYTHONPATH: the local reward
    server runs the custom scorer, and the learner trains on its values."""
    env = {**os.environ, "PYTHONPATH": "examples/custom_reward", "DIFFRL_REWARD_TOKEN": ""}
    tmp_ray = tempfile.mkdtemp(prefix="diffrl-ray-custom-", dir="/tmp")
    cmd = [str(Path(sys.executable).with_name("diffrl")), "train", "examples/custom_reward/recipe.yaml",
           "model.path=assets/shapes-base", f"run.output_dir={tmp_path}", "run.name=custom", "run.max_steps=2",
           "run.max_seconds=0", "run.eval_every=0", "run.progress=false", "sampler.num_samplers=1", "sampler.k=4",
           "sampler.groups_per_round=1", "sampler.max_pending_groups=2", "sampler.sampling.num_steps=2",
           "learner.groups_per_step=1", "learner.checkpoint_every=0", "learner.crd.num_noise_levels=2",
           "learner.crd.num_sampling_steps=2", "rewards.0.serve_args=[scorer.target=1.0]",
           f"ray.temp_dir={tmp_ray}"]
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(tmp_ray, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "custom"
    steps = [rec for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if rec["kind"] == "train"]
    assert [rec["step"] for rec in steps] == [1, 2]
    for rec in steps:
        # target 1.0: the reward is the mean brightness of shapes-world images (near-white background)
        assert set(rec["reward_mean_by"]) == {"brightness"} and rec["reward_mean"] == rec["reward_mean_by"]["brightness"]
        assert 0.5 < rec["reward_mean_by"]["brightness"] < 1.0 and math.isfinite(rec["loss"])
    log = (run_dir / "logs" / "reward-brightness-0.log").read_text()
    assert "diffrl reward server 'brightness'" in log
